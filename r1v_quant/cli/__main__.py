"""`python -m r1v_quant.cli`: the same as the `r1v-quant` script."""

from r1v_quant.cli.main import main

if __name__ == "__main__":
    main()
