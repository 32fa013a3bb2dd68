"""livesplice.process"""
