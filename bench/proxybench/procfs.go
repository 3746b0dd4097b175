package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// proc identifies a process: its PID and its start time (field 22 of
// /proc/PID/stat), so a recycled PID is never mistaken for it.
type proc struct {
	PID   int
	Start uint64
}

// procStat reads the parent PID and start time of pid.
func procStat(pid int) (ppid int, start uint64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	// The command name may hold spaces and parentheses: fields start after
	// the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: no ')'", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); ppid is field 4, starttime field 22.
	if len(f) < 20 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	ppid, err = strconv.Atoi(f[1])
	if err != nil {
		return 0, 0, fmt.Errorf("/proc/%d/stat: ppid: %w", pid, err)
	}
	start, err = strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("/proc/%d/stat: starttime: %w", pid, err)
	}
	return ppid, start, nil
}

// alive reports whether p still runs (same PID, same start time).
func (p proc) alive() bool {
	_, start, err := procStat(p.PID)
	return err == nil && start == p.Start
}

// tree returns root and all its descendants, root first.
func tree(root int) []proc {
	_, start, err := procStat(root)
	if err != nil {
		return nil
	}
	children := map[int][]proc{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		ppid, st, err := procStat(pid)
		if err != nil {
			continue
		}
		children[ppid] = append(children[ppid], proc{PID: pid, Start: st})
	}
	out := []proc{{PID: root, Start: start}}
	for i := 0; i < len(out); i++ {
		out = append(out, children[out[i].PID]...)
	}
	return out
}

// treeUsage is what a process tree holds, summed over its processes.
type treeUsage struct {
	Procs  int   `json:"procs"`
	RSSKiB int64 `json:"rss_kib"`
	// AnonKiB and FileKiB split VmRSS into RssAnon (heap, stacks) and
	// RssFile + RssShmem (mapped binary and libraries, shared memory).
	AnonKiB int64 `json:"rss_anon_kib"`
	FileKiB int64 `json:"rss_file_kib"`
	FDs     int   `json:"fds"`
	Sockets int   `json:"sockets"`
	Pipes   int   `json:"pipes"`
	Other   int   `json:"other_fds"`
	// OtherKinds counts the "other" fds by what they point at
	// (anon_inode:[eventpoll], /dev/null, a log file…).
	OtherKinds map[string]int `json:"other_kinds,omitempty"`
}

// usage sums VmRSS and open fds over root's process tree.
func usage(root int) (treeUsage, error) {
	var u treeUsage
	procs := tree(root)
	if len(procs) == 0 {
		return u, fmt.Errorf("process %d is gone", root)
	}
	u.OtherKinds = map[string]int{}
	for _, p := range procs {
		m, err := statusKiB(p.PID)
		if err != nil {
			return u, err
		}
		u.Procs++
		u.RSSKiB += m["VmRSS"]
		u.AnonKiB += m["RssAnon"]
		u.FileKiB += m["RssFile"] + m["RssShmem"]
		fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.PID))
		if err != nil {
			return u, fmt.Errorf("list fds of %d: %w", p.PID, err)
		}
		for _, fd := range fds {
			target, err := os.Readlink(filepath.Join(fmt.Sprintf("/proc/%d/fd", p.PID), fd.Name()))
			if err != nil {
				continue // closed meanwhile
			}
			u.FDs++
			switch {
			case strings.HasPrefix(target, "socket:"):
				u.Sockets++
			case strings.HasPrefix(target, "pipe:"):
				u.Pipes++
			default:
				u.Other++
				u.OtherKinds[target]++
			}
		}
	}
	return u, nil
}

// statusKiB returns the kB-valued fields of /proc/PID/status (VmRSS,
// RssAnon…); a zombie or kernel thread has none.
func statusKiB(pid int) (map[string]int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil, fmt.Errorf("read status of %d: %w", pid, err)
	}
	out := map[string]int64{}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		f := strings.Fields(v)
		if !ok || len(f) != 2 || f[1] != "kB" {
			continue
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("/proc/%d/status: %s: %w", pid, k, err)
		}
		out[k] = n
	}
	return out, nil
}

// socketInodes returns the inodes of the sockets open in root's tree.
func socketInodes(root int) map[string]bool {
	out := map[string]bool{}
	for _, p := range tree(root) {
		dir := fmt.Sprintf("/proc/%d/fd", p.PID)
		fds, _ := os.ReadDir(dir)
		for _, fd := range fds {
			t, err := os.Readlink(filepath.Join(dir, fd.Name()))
			if err == nil && strings.HasPrefix(t, "socket:[") {
				out[strings.TrimSuffix(strings.TrimPrefix(t, "socket:["), "]")] = true
			}
		}
	}
	return out
}

// listening reports whether root's tree holds a TCP socket listening on
// 127.0.0.1:port (from /proc/net/tcp, matched by inode). Readiness is
// checked this way so that no probe connection touches the proxy before
// its baseline is read.
func listening(root, port int) (bool, error) {
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return false, fmt.Errorf("read /proc/net/tcp: %w", err)
	}
	want := fmt.Sprintf("0100007F:%04X", port)
	var inodes []string
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		// sl local rem st tx:rx tr:when retrnsmt uid timeout inode
		if len(f) >= 10 && f[1] == want && f[3] == "0A" {
			inodes = append(inodes, f[9])
		}
	}
	if len(inodes) == 0 {
		return false, nil
	}
	mine := socketInodes(root)
	for _, ino := range inodes {
		if mine[ino] {
			return true, nil
		}
	}
	return false, nil
}

// waitListening polls until root's tree listens on port, the process
// exits (exited is closed), or ctx ends.
func waitListening(ctx context.Context, root, port int, exited <-chan struct{}) error {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, err := listening(root, port)
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for 127.0.0.1:%d to listen: %w", port, ctx.Err())
		case <-exited:
			return fmt.Errorf("exited before listening on 127.0.0.1:%d", port)
		case <-tick.C:
		}
	}
}

// loadAvg returns /proc/loadavg's first three fields.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// timeWait returns the host's TCP sockets in TIME_WAIT (the "tw" of
// /proc/net/sockstat), -1 if unknown. Every short connection a run makes
// leaves two (client and proxy side of the backend), and with tens of
// thousands of them every connect() searches longer for a free port, so
// later targets pay for earlier ones: the rate progress lines show it.
func timeWait() int {
	b, err := os.ReadFile("/proc/net/sockstat")
	if err != nil {
		return -1
	}
	return parseTimeWait(string(b))
}

// parseTimeWait reads the "tw" count of the TCP line of a sockstat file.
func parseTimeWait(s string) int {
	for _, line := range strings.Split(s, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "TCP:" {
			continue
		}
		for i := 1; i+1 < len(f); i += 2 {
			if f[i] == "tw" {
				if n, err := strconv.Atoi(f[i+1]); err == nil {
					return n
				}
			}
		}
	}
	return -1
}

// sortedKinds formats a fd-kind count map deterministically.
func sortedKinds(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s×%d", k, m[k])
	}
	return strings.Join(parts, ", ")
}

// clockTick is USER_HZ, the unit of utime and stime in /proc/PID/stat
// (100 on every Linux architecture Go supports here).
const clockTick = 10 * time.Millisecond

// cpuTime returns the user and system CPU time used so far by the
// processes of root's tree (all their threads), from /proc/PID/stat.
func cpuTime(root int) (user, sys time.Duration) {
	for _, p := range tree(root) {
		u, s := procCPU(p.PID)
		user += u
		sys += s
	}
	return user, sys
}

// procCPU returns one process's user and system CPU time (all threads).
func procCPU(pid int) (user, sys time.Duration) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, 0
	}
	// f[0] is field 3; utime is field 14, stime field 15.
	u, _ := strconv.ParseInt(f[11], 10, 64)
	s, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(u) * clockTick, time.Duration(s) * clockTick
}

// schedInfo describes this process's scheduling (policy, RT priority,
// nice) from /proc/self/stat; peers inherit it.
func schedInfo() string {
	b, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return "?"
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return "?"
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 39 {
		return "?"
	}
	// Field N is f[N-3]: nice 19, rt_priority 40, policy 41.
	nice, rtprio, policy := f[16], f[37], f[38]
	switch policy {
	case "1":
		return "SCHED_FIFO priority " + rtprio
	case "2":
		return "SCHED_RR priority " + rtprio
	}
	return "SCHED_OTHER nice " + nice
}
