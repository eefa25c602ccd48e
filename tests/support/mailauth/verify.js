#!/usr/bin/env node
// Verify DKIM signatures with mailauth (Node.js), an implementation independent of dkimpy.
//
// Usage: node verify.js --dns 127.0.0.1:PORT [--now UNIX_SECONDS] MESSAGE_FILE...
//
// Keys are looked up over real DNS at the given server (tests/support/dnsserver.py). Prints one
// JSON line per file: {"file": ..., "signatures": [{domain, selector, algorithm, result, comment}]},
// signatures in header order. Exit status 2 on a usage or runtime error.
'use strict';

const fs = require('node:fs');
const { Resolver } = require('node:dns').promises;
const { dkimVerify } = require('mailauth/lib/dkim/verify');

async function main() {
    const args = process.argv.slice(2);
    let server = null;
    let now = null;
    const files = [];
    for (let i = 0; i < args.length; i++) {
        if (args[i] === '--dns') {
            server = args[++i];
        } else if (args[i] === '--now') {
            now = new Date(Number(args[++i]) * 1000);
        } else {
            files.push(args[i]);
        }
    }
    if (!server || !files.length) {
        throw new Error('usage: verify.js --dns HOST:PORT [--now SECONDS] MESSAGE_FILE...');
    }
    // c-ares falls back to TCP on a truncated UDP answer, as large RSA key records need.
    const resolver = new Resolver({ timeout: 3000, tries: 2 });
    resolver.setServers([server]);
    for (const file of files) {
        const message = fs.readFileSync(file);
        const options = { resolver: (name, rrtype) => resolver.resolve(name, rrtype) };
        if (now) {
            options.curTime = now;
        }
        const res = await dkimVerify(message, options);
        const signatures = res.results
            .filter(r => r.signingDomain !== undefined)
            .map(r => ({
                domain: r.signingDomain || '',
                selector: r.selector || '',
                algorithm: r.algo || '',
                result: (r.status && r.status.result) || '',
                comment: (r.status && r.status.comment) || ''
            }));
        process.stdout.write(JSON.stringify({ file, signatures }) + '\n');
    }
}

main().catch(err => {
    process.stderr.write(`${err.stack || err}\n`);
    process.exit(2);
});
