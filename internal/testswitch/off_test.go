//go:build !sniproxytest

package testswitch

import "testing"

func TestReadWithoutTagIsProduction(t *testing.T) {
	t.Setenv("SNIPROXYTEST_NO_MOVE", "1")
	t.Setenv("SNIPROXYTEST_STOP_DELAY", "1s")
	if got := Read(); got != (Switches{}) {
		t.Errorf("Read() without the sniproxytest tag: got %+v; want the zero Switches", got)
	}
}
