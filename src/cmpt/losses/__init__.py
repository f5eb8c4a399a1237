"""cmpt.losses"""
