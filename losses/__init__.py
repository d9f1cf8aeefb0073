"""Loss functions of MCL as pure functions on tensors: in-batch supervised MCL (CIFAR),
memory-bank MCL (ImageNet), MCL on MoCo queues, KL distillation and the projection heads."""
