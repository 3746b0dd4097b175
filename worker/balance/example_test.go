package balance_test

import (
	"fmt"
	"net/netip"

	"github.com/sniproxy/sniproxy/worker/balance"
)

func ExampleBalancer_Pick() {
	b, err := balance.New(balance.RoundRobin, []balance.Backend{
		{Key: "10.0.0.1:443", Weight: 2},
		{Key: "10.0.0.2:443", Weight: 1},
		{Key: "10.0.0.3:443", Weight: 1, Backup: true},
	}, balance.Options{})
	if err != nil {
		panic(err)
	}
	down := map[int]bool{}
	up := func(i int) bool { return !down[i] }
	client := netip.MustParseAddr("192.0.2.1")
	var buf [8]int // no allocation while the pool fits
	for range 3 {
		order := b.Pick(buf[:0], client, up)
		fmt.Println(order) // dial order[0]; on failure order[1], ...
	}
	down[0], down[1] = true, true
	fmt.Println(b.Pick(buf[:0], client, up)) // only the backup is up
	down[2] = true
	fmt.Println(b.Pick(buf[:0], client, up)) // nothing is up: try them all
	// Output:
	// [0 1]
	// [1 0]
	// [0 1]
	// [2]
	// [0 1 2]
}
