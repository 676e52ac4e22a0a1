"""segbook.groupers"""
