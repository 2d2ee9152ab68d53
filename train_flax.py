"""Train or fine-tune a ViT/DeiT/Swin in JAX: `python train_flax.py --help`. The machinery is `vit_train`.

    python train_flax.py                                            # small ViT on scikit-learn digits
    python train_flax.py --model vit_base_patch16_224 --weights ViT-B_16.npz --data-path flower_photos
    python train_flax.py --dataset cifar10 --data-path cifar-10-python.tar.gz --mesh data=4,fsdp=2

From Python: `vit_train.train(vit_train.TrainConfig(epochs=2))` (the same flags as fields) returns the params.
"""
import sys

from vit_train import main

if __name__ == '__main__':
    sys.exit(main())
