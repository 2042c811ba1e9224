"""`python -m hetcache ...` (and `torchrun --nproc-per-node N -m hetcache edit|bench ...`): the command line."""

from hetcache.cli import main

main()
