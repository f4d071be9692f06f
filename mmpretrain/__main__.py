"""``python -m mmpretrain`` is the ``mmpretrain`` command."""

from mmpretrain.cli import main

if __name__ == "__main__":
    main()
