"""livesplice.kernel"""
