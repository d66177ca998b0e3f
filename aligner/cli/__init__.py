"""aligner.cli"""
