"""segbook.graphs"""
