"""The ResNet-18 and everything that trains it: the loop, decoded-once images, augmentation, recipes, checkpoints, batch norm across processes."""
