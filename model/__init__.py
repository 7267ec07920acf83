"""bct.model"""
