//go:build sniproxytest

package testswitch

import (
	"os"
	"time"
)

// Read returns the switches set in the environment.
func Read() Switches {
	duration := func(key string) time.Duration {
		d, err := time.ParseDuration(os.Getenv(key))
		if err != nil {
			return 0
		}
		return d
	}
	return Switches{
		ReplaceDeadSockets: os.Getenv("SNIPROXYTEST_REPLACE_DEAD_SOCKETS") == "1",
		FreshSockets:       os.Getenv("SNIPROXYTEST_FRESH_SOCKETS") == "1",
		NoMove:             os.Getenv("SNIPROXYTEST_NO_MOVE") == "1",
		UpgradeTimeout:     duration("SNIPROXYTEST_UPGRADE_TIMEOUT"),
		HangIfFile:         os.Getenv("SNIPROXYTEST_HANG_IF_FILE"),
		StopDelay:          duration("SNIPROXYTEST_STOP_DELAY"),
	}
}
