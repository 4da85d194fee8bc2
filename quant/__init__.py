"""almak.quant"""
