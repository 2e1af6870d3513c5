"""bnopt: why does BatchNorm help optimisation? Models, normalisations, data, training loop and the paper's
measurements (:mod:`bnopt.probes`). A regular package, not a namespace one: a namespace package merges every
``bnopt`` directory on ``sys.path``, so with two checkouts about (a clone beside an editable install) modules
came from both, silently."""
