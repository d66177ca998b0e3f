"""aligner.models"""
