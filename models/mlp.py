"""Fully connected teacher and student for knowledge distillation (Hinton et al., "Distilling the
Knowledge in a Neural Network", 2015). Teacher: 2 x 1200 ReLU units with dropout as in the paper's MNIST
experiment (p = 0.3 here, milder than the usual 0.5, for short schedules). Student: 2 x 100 ReLU units, no
dropout (the paper's student has 2 x 800; a smaller one leaves more for distillation to recover);
mlp_student_seed: the seed's 2 x 20 student (configs/distill_seed.yaml).
The input is flattened: in_chans * img_size**2 features, so these are meant for 28-32 px images.
"""
from torch import nn

from utils.errors import UserError


class MLP(nn.Module):
    def __init__(self, in_features, hidden, num_classes, dropout=0.0):
        super().__init__()
        layers = [nn.Flatten()]
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def _check_no_residual_tricks(name, attn_layer, drop_path_rate):
    if attn_layer is not None or drop_path_rate > 0:
        raise UserError(f"{name} has no residual blocks; use --attention none --drop_path_rate 0")


def mlp_teacher(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0):
    _check_no_residual_tricks("mlp_teacher", attn_layer, drop_path_rate)
    return MLP(in_chans * img_size * img_size, (1200, 1200), num_classes, dropout=0.3)


def mlp_student(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0):
    _check_no_residual_tricks("mlp_student", attn_layer, drop_path_rate)
    return MLP(in_chans * img_size * img_size, (100, 100), num_classes)


def mlp_student_seed(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0):
    _check_no_residual_tricks("mlp_student_seed", attn_layer, drop_path_rate)
    return MLP(in_chans * img_size * img_size, (20, 20), num_classes)
