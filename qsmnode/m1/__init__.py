"""The M1 analysis: motor-cortex areas, cortical layers and thickness, and their measurements.

Pure numerical code: arrays in, arrays and tables out.
"""
