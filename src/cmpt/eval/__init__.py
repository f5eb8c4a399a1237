"""cmpt.eval"""
