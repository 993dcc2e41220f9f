"""The `r1v-quant` command line: click commands, thin wrappers over the library. Nothing imports this
package."""
