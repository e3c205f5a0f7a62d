"""ACE pretraining as a library: data, schedules, checkpoints and the Accelerate loop.

Training-side package: never imported by the files that travel to the Hub.
"""
