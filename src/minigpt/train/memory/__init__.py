"""Memory of a training run or an inference server, predicted from the config (``minigpt plan``) and measured
(``minigpt bench memory``): :mod:`.counting` counts live tensor bytes, :mod:`.planner` predicts them."""
