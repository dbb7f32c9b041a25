"""Generation: the decoding core and the generate scripts' command line."""
