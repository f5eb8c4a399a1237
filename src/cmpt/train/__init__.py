"""cmpt.train"""
