"""segbook.upsamplers"""
