"""segbook.eval"""
