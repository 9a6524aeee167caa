// A TCP relay in Go, one goroutine per direction, for bench/compare.py: the anchor a user
// would write instead of splicepool. io.Copy between two *net.TCPConn is TCPConn.ReadFrom,
// which Go turns into splice(2) through a pipe on Linux.
//
//	relay -listen 127.0.0.1:PORT -connect 127.0.0.1:UPSTREAM
package main

import (
	"flag"
	"io"
	"log"
	"net"
)

// pipe copies src to dst until EOF, then half-closes dst (the FIN goes on), and reports.
func pipe(dst, src *net.TCPConn, done chan<- struct{}) {
	io.Copy(dst, src)
	dst.CloseWrite()
	done <- struct{}{}
}

func serve(client *net.TCPConn, upstream string) {
	defer client.Close()
	conn, err := net.Dial("tcp", upstream)
	if err != nil {
		return
	}
	up := conn.(*net.TCPConn)
	defer up.Close()
	done := make(chan struct{}, 2)
	go pipe(up, client, done)
	go pipe(client, up, done)
	<-done
	<-done
}

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "address to accept on")
	connect := flag.String("connect", "127.0.0.1:8000", "upstream address")
	flag.Parse()
	addr, err := net.ResolveTCPAddr("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	ln, err := net.ListenTCP("tcp", addr)
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("listening on %s, relaying to %s", *listen, *connect)
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			log.Print(err)
			continue
		}
		go serve(c, *connect)
	}
}
