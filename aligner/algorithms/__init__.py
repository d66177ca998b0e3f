"""aligner.algorithms"""
