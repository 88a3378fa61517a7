"""Building blocks shared by the model families: layers, text encoders, cross attention,
BERT, ResNet, GloVe, the training recipes and the option declarations (`options`)."""
