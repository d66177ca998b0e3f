"""aligner.training"""
