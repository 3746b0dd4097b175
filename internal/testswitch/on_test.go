//go:build sniproxytest

package testswitch

import (
	"testing"
	"time"
)

func TestReadWithTag(t *testing.T) {
	t.Setenv("SNIPROXYTEST_NO_MOVE", "1")
	t.Setenv("SNIPROXYTEST_STOP_DELAY", "1s")
	got := Read()
	if !got.NoMove || got.StopDelay != time.Second || got.FreshSockets {
		t.Errorf("Read() with the sniproxytest tag: got %+v; want NoMove and StopDelay 1s only", got)
	}
}
