"""Quantitative susceptibility mapping: pure numerical code, arrays in and arrays out."""
