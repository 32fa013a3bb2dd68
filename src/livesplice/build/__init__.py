"""livesplice.build"""
