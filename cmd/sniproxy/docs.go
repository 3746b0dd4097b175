package main

import (
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
)

// completionCmd writes a shell's completion script. The scripts are
// cobra's: they ask the binary itself (the hidden __complete command) for
// the commands and flags, so hidden commands (worker, man) never show up.
func completionCmd(stdout io.Writer) *cobra.Command {
	return &cobra.Command{
		Use:   "completion bash|zsh|fish",
		Short: "Print the shell completion script for bash, zsh or fish",
		Long: `Completion prints the script that completes sniproxy's commands and flags
in the given shell. To load it in bash (or save it as
/etc/bash_completion.d/sniproxy):

    source <(sniproxy completion bash)

in zsh (with "autoload -U compinit; compinit" in ~/.zshrc):

    sniproxy completion zsh > "${fpath[1]}/_sniproxy"

in fish:

    sniproxy completion fish > ~/.config/fish/completions/sniproxy.fish`,
		ValidArgs:             []string{"bash", "zsh", "fish"},
		Args:                  cobra.MatchAll(cobra.ExactArgs(1), cobra.OnlyValidArgs),
		DisableFlagsInUseLine: true,
		RunE: func(c *cobra.Command, args []string) error {
			root := c.Root()
			var err error
			switch args[0] {
			case "bash":
				err = root.GenBashCompletionV2(stdout, true)
			case "zsh":
				err = root.GenZshCompletion(stdout)
			case "fish":
				err = root.GenFishCompletion(stdout, true)
			}
			if err != nil {
				return fmt.Errorf("completion %s: %w", args[0], err)
			}
			return nil
		},
	}
}

// manCmd is the hidden man command: it writes the man pages (sniproxy.1
// and sniproxy-COMMAND.1 for each command in help) generated from the
// command tree, so they say what --help says. Packaging runs it; it is not
// for users, hence hidden. SOURCE_DATE_EPOCH, when set, dates the pages
// (reproducible builds).
func manCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "man [DIR]",
		Short:  "Write the man pages into DIR (default: the current directory)",
		Hidden: true,
		Args:   cobra.MaximumNArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			dir := "."
			if len(args) == 1 {
				dir = args[0]
			}
			if err := writeManPages(c.Root(), dir); err != nil {
				fmt.Fprintf(c.ErrOrStderr(), "sniproxy: man: %v\n", err)
				return exitStatus(1)
			}
			return nil
		},
	}
}

// writeManPages writes root's man pages into dir, creating it if need be.
func writeManPages(root *cobra.Command, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	root.DisableAutoGenTag = true
	header := &doc.GenManHeader{Section: "1", Source: "sniproxy " + version, Manual: "sniproxy manual"}
	if err := doc.GenManTree(root, header, dir); err != nil {
		return fmt.Errorf("writing to %s: %w", dir, err)
	}
	return nil
}
