"""cmpt.vision"""
