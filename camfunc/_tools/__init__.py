"""Whole-model methods and wrappers, built on the core and the methods: FullGrad, guided
backpropagation, LeGrad, deep feature factorisation, augmentation smoothing."""
