"""Look at what ACE encoders learned: PCA colours and query similarity of their patch embeddings.

    python examples/visualize.py --model_name_or_path outputs/ace-pretrain --heldout 4 --output_dir vis
    python examples/visualize.py --model_name_or_path outputs/ace-pretrain org/ace-vit-b --images xrays/ \\
        --query 200 150 --random_init --output_dir vis
    python examples/visualize.py visualize.yaml   # the same arguments from a .json or .yaml file

Writes `pca.png` and `similarity.png` to --output_dir. Every field of `ace_hf.commands.visualize.VisualizationArguments`
is an option; see `ace_hf.commands.visualize` for what the pictures show.
"""

import sys

from ace_hf.commands.visualize import main

if __name__ == "__main__":
    sys.exit(main())
