"""`python -m posttrain ...` (what `accelerate launch -m posttrain run R` starts on every rank)."""

from posttrain.cli import main

if __name__ == "__main__":
    main()
