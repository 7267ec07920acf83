"""bct.hw"""
