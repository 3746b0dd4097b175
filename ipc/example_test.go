package ipc_test

import (
	"fmt"
	"log"

	"github.com/sniproxy/sniproxy/ipc"
)

// A lease refill: the worker asks for permits, the master grants them. In
// production the worker end is another process (see the package doc); here
// both ends are in one process.
func Example() {
	master, workerFile, err := ipc.Pair()
	if err != nil {
		log.Fatal(err)
	}
	defer master.Close()
	worker, err := ipc.FileConn(workerFile)
	workerFile.Close()
	if err != nil {
		log.Fatal(err)
	}
	defer worker.Close()

	// The master's reader goroutine.
	go func() {
		for {
			m, err := master.Recv()
			if err != nil {
				return // io.EOF: the worker is gone
			}
			b, err := ipc.Decode(m)
			m.CloseFiles()
			if err != nil {
				return
			}
			if req, ok := b.(ipc.LeaseRequest); ok {
				master.SendBody(ipc.LeaseGrant{N: min(req.Want, 50)})
			}
		}
	}()

	if err := worker.SendBody(ipc.LeaseRequest{Want: 64}); err != nil {
		log.Fatal(err)
	}
	m, err := worker.Recv()
	if err != nil {
		log.Fatal(err)
	}
	b, err := ipc.Decode(m)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%v: %+v\n", m.Type, b)
	// Output: lease_grant: {N:50}
}
