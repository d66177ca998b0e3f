"""aligner.rollout"""
