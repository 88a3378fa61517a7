"""Building blocks shared by the model families (text encoders, cross attention, BERT, ResNet, recipes)."""
