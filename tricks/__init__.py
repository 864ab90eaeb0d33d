"""One file per trick: weight averaging (ema, swa, lookahead), batch mixing (mix), adversarial training
(adversarial, awp), data pruning (infobatch), initialisation (init), distillation (kd), progressive resizing."""
