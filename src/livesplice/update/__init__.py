"""livesplice.update"""
