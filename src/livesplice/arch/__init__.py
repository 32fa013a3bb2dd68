"""What livesplice knows about each instruction set, one module per architecture (x86_64.py
today): the matchers and the diff ask it instead of decoding instructions themselves."""
