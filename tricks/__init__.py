"""One file per trick: weight averaging (ema, swa, lookahead), batch mixing (mix), adversarial training
(adversarial, awp), sharpness-aware minimisation (sam), data pruning (infobatch), initialisation (init),
distillation (kd), progressive resizing."""
