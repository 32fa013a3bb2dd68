"""livesplice.diff"""
