"""bct.sim"""
